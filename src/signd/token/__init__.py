"""The token side: the only code that touches PKCS#11 (in worker processes),
and the pool that schedules work onto them."""
