from tracejail.launch import run

run()
