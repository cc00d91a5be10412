"""The pricing module of the example shop: the code the canary replaces, one call at a time."""

PRICES = {"book": 12.0, "pen": 1.5, "lamp": 30.0}
DISCOUNT = 0.0


def price(sku, qty):
    """The price of ``qty`` items of ``sku``."""
    return round(PRICES[sku] * qty * (1 - DISCOUNT), 2)
