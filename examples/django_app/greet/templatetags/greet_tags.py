"""A custom template filter, registered in the library ``{% load greet_tags %}`` loads."""

from django import template

register = template.Library()


@register.filter
def greeting(name: str) -> str:
    return f"Hello, {name}!"
