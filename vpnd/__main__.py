from vpnd.cli import run

run()
