"""signd: a signing daemon whose private keys never leave a PKCS#11 token."""

__version__ = "0.1.0"
__all__ = ["__version__"]
