"""A broken next version of pricing.py: it fails for lamps. The canary rolls it back."""

PRICES = {"book": 12.0, "pen": 1.5, "lamp": 30.0}
DISCOUNT = 0.0


def price(sku, qty):
    """The price of ``qty`` items of ``sku``."""
    if sku == "lamp":
        raise KeyError("lamp: price list not loaded")
    return round(PRICES[sku] * qty * (1 - DISCOUNT), 2)
