from tracejail.cli import main

main()
