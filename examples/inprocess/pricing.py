"""A module a live service depends on: the example patches it while threads call it."""

TAX_RATE = 0.20
QUOTES = {}  # live state: a cache the patch must not lose


def tax(amount):
    return round(amount * TAX_RATE, 2)


def quote(sku, amount):
    total = amount + tax(amount)
    QUOTES[sku] = total
    return total


class Basket:
    def __init__(self):
        self.items = []

    def add(self, sku, amount):
        self.items.append((sku, amount))
        return self

    def total(self):
        return sum(quote(sku, amount) for sku, amount in self.items)
