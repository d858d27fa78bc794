"""vpnd: a certificate-authenticated VPN over mutual TLS 1.3."""

__version__ = "0.1.0"
