"""Filesystem helpers shared by vpnd and vpnctl: atomic writes, file watches, secrets."""
