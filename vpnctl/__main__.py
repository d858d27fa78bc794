from vpnctl.cli import run

run()
