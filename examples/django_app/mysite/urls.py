"""URLs of the example. Adding a URL needs a rolling reload: Django caches its resolver."""

from django.urls import path
from greet import views

urlpatterns = [
    path("", views.index),
    path("hello/", views.hello),
    path("healthz", views.healthz),
]
