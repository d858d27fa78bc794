"""The client (a laptop or a site router): dials the gateway, brings the TUN up."""
