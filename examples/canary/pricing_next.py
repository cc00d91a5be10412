"""The next version of pricing.py: a volume discount. The canary runs it beside the live one."""

PRICES = {"book": 12.0, "pen": 1.5, "lamp": 30.0}
DISCOUNT = 0.0


def volume_discount(qty):
    return 0.1 if qty >= 10 else DISCOUNT


def price(sku, qty):
    """The price of ``qty`` items of ``sku``."""
    return round(PRICES[sku] * qty * (1 - volume_discount(qty)), 2)
