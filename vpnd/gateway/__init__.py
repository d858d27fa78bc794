"""The gateway: admission and the routing of packets between the TUN and peers.

Import from the submodules; this package re-exports nothing, so importing the pure
core never drags in the asyncio shell.
"""
