"""matplotlib-venv: draw a chart with the Agg backend and describe the PNG it makes.

    .venv/bin/python app.py

The PNG is written to memory, not to disk; what is printed (sizes, the font that set the title,
the PNG header) does not depend on where the program runs.
"""

import io
import os
import struct

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
from matplotlib import font_manager  # noqa: E402


def main() -> None:
    fig, ax = plt.subplots(figsize=(6.4, 4.8), dpi=100)
    xs = list(range(10))
    ax.plot(xs, [x * x for x in xs], label="squares")
    ax.bar(xs, [x * 3 for x in xs], alpha=0.3, label="triples")
    ax.set_title("Squares and triples")
    ax.legend()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    png = buf.getvalue()
    width, height = struct.unpack(">II", png[16:24])
    title_font = font_manager.findfont(ax.title.get_fontproperties(), fallback_to_default=False)
    print("backend:", matplotlib.get_backend())
    print("png signature ok:", png[:8] == b"\x89PNG\r\n\x1a\n")
    print(f"png size: {width}x{height}")
    print("png is not blank:", len(png) > 10000)
    print("title font:", os.path.basename(title_font))
    print("legend entries:", [t.get_text() for t in ax.get_legend().get_texts()])


if __name__ == "__main__":
    main()
