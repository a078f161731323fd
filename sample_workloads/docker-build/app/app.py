"""Stock report: loads data/stock.csv into an in-memory SQLite database and prints totals."""
import csv
import json
import sqlite3
from pathlib import Path

HERE = Path(__file__).resolve().parent

db = sqlite3.connect(":memory:")
db.execute("CREATE TABLE stock (item TEXT, warehouse TEXT, qty INTEGER, price_cents INTEGER)")
with open(HERE / "data" / "stock.csv", newline="") as f:
    rows = list(csv.DictReader(f))
db.executemany("INSERT INTO stock VALUES (:item, :warehouse, :qty, :price_cents)", rows)

print(f"sqlite {sqlite3.sqlite_version_info[0]}, {len(rows)} rows")
for warehouse, items, qty, value in db.execute(
        "SELECT warehouse, COUNT(*), SUM(qty), SUM(qty * price_cents) FROM stock "
        "GROUP BY warehouse ORDER BY warehouse"):
    print(f"{warehouse:<8} {items} items {qty:>4} units {value / 100:>9.2f}")
top = db.execute("SELECT item FROM stock ORDER BY qty * price_cents DESC LIMIT 1").fetchone()[0]
print(json.dumps({"top": top, "warehouses": [w for (w,) in db.execute(
    "SELECT DISTINCT warehouse FROM stock ORDER BY 1")]}, sort_keys=True))
