"""The example's views: ``/`` (the version, for the load test), ``/hello/``, ``/healthz``."""

import os

from django.http import HttpRequest, HttpResponse
from django.shortcuts import render

from greet.forms import GreetForm

VERSION = "1"


def index(request: HttpRequest) -> HttpResponse:
    return HttpResponse(f"version={VERSION} pid={os.getpid()}\n", content_type="text/plain")


def hello(request: HttpRequest) -> HttpResponse:
    form = GreetForm(request.GET or None)
    name = form.cleaned_data["name"] if form.is_valid() else "world"
    return render(request, "greet/hello.html", {"form": form, "name": name})


def healthz(request: HttpRequest) -> HttpResponse:
    return HttpResponse("ok\n", content_type="text/plain")
