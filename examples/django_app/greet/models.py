"""A model, not used for serving (the example has no database).

Its methods can be patched in place; a field added, removed or changed needs a rolling reload
(and, in a real project, a migration first): hotpatch refuses it in place and says so.
"""

from django.db import models


class Greeting(models.Model):
    name = models.CharField(max_length=40)

    def __str__(self) -> str:
        return f"hello, {self.name}"
