"""Client library for signd, the PKCS#11 signing daemon."""
