"""In-process patches of Django code, each outcome checked through Django's test ``Client``.

One Django project (settings, URLconf, views, a form, a template with a custom filter, a model)
is written to a temporary directory and set up once in this process. Each test patches one of
its modules with ``hotpatch.Engine`` (the new source given as text; the files never change), then
asks Django: a change the engine applies must be what Django runs; a change it cannot apply
(the URLconf that Django's cached resolver holds, a field of a model or a form, which their
metaclasses built) is refused with a reason that says a restart or rolling reload is needed, and
Django answers exactly as before. Every test rolls its patch back.
"""

from __future__ import annotations

import sys
import textwrap
import uuid
import warnings
from collections.abc import Iterator
from importlib import import_module

import pytest

from hotpatch import Engine, PatchRejected

pytest.importorskip("django", reason="django is not installed (the test extra installs it)")

PACKAGE = f"hp_dj_{uuid.uuid4().hex[:8]}"

FILES = {
    "__init__.py": "",
    "urls.py": """
        from django.urls import path

        from {pkg} import views

        urlpatterns = [
            path("hello/", views.hello),
            path("page/", views.page),
            path("form/", views.form),
        ]
    """,
    "views.py": """
        from django.http import HttpResponse, JsonResponse
        from django.shortcuts import render

        from {pkg}.forms import NameForm


        def hello(request):
            return HttpResponse("hello v1")


        def page(request):
            return render(request, "page.html", {{"who": "ann"}})


        def form(request):
            form = NameForm(request.GET)
            if form.is_valid():
                return JsonResponse({{"name": form.cleaned_data["name"]}})
            return JsonResponse({{"errors": form.errors}}, status=400)
    """,
    "forms.py": """
        from django import forms


        class NameForm(forms.Form):
            name = forms.CharField(max_length=5)

            def clean_name(self):
                return self.cleaned_data["name"].upper()
    """,
    "models.py": """
        from django.db import models
        from django.db.models.signals import post_init
        from django.dispatch import receiver


        class Note(models.Model):
            text = models.CharField(max_length=100)

            def __str__(self):
                return f"note: {{self.text}}"


        class Comment(models.Model):
            note = models.ForeignKey(Note, on_delete=models.CASCADE)


        @receiver(post_init, sender=Note)
        def noted(sender, instance, **kwargs):
            instance.seen = True
    """,
    "templatetags/__init__.py": "",
    "templatetags/shout.py": """
        from django import template

        register = template.Library()


        @register.filter
        def shout(value):
            return f"{{value}}!"
    """,
    "templates/page.html": "{{% load shout %}}{{{{ who|shout }}}}\n",
}


def _source(relative: str) -> str:
    return textwrap.dedent(FILES[relative].format(pkg=PACKAGE)).lstrip("\n")


@pytest.fixture(scope="module", name="client")
def _client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    from django.conf import settings

    if settings.configured:
        pytest.skip("Django is already configured in this process")
    root = tmp_path_factory.mktemp("django")
    for relative in FILES:
        path = root / PACKAGE / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(_source(relative), encoding="utf-8")
    sys.path.insert(0, str(root))
    settings.configure(
        SECRET_KEY="test",
        DEBUG=False,
        ALLOWED_HOSTS=["testserver"],
        ROOT_URLCONF=f"{PACKAGE}.urls",
        INSTALLED_APPS=[PACKAGE],
        DATABASES={},
        DEFAULT_AUTO_FIELD="django.db.models.BigAutoField",
        TEMPLATES=[
            {"BACKEND": "django.template.backends.django.DjangoTemplates", "APP_DIRS": True}
        ],
    )
    import django
    from django.test import Client

    django.setup()
    client = Client(raise_request_exception=True)
    assert client.get("/hello/").content == b"hello v1"  # the URL resolver is built and cached
    assert client.get("/page/").content == b"ann!\n"  # the template library is loaded
    import_module(f"{PACKAGE}.models")
    yield client
    sys.path.remove(str(root))


@pytest.fixture(name="engine")
def _engine(client: object) -> Engine:
    engine = Engine()
    for name in ("urls", "views", "forms", "models", "templatetags.shout"):
        engine.track(f"{PACKAGE}.{name}")
    return engine


def _patch(engine: Engine, module: str, old: str, new: str) -> None:
    relative = module.replace(".", "/") + ".py"
    source = _source(relative)
    assert old in source
    engine.patch(f"{PACKAGE}.{module}", source=source.replace(old, new))


def _refused(engine: Engine, module: str, old: str, new: str) -> PatchRejected:
    with pytest.raises(PatchRejected) as info:
        _patch(engine, module, old, new)
    assert info.value.stage == "compatibility", info.value
    return info.value


def test_a_view_change_runs_through_the_url_resolver(client, engine) -> None:
    _patch(engine, "views", "hello v1", "hello v2")
    assert client.get("/hello/").content == b"hello v2"
    engine.rollback(f"{PACKAGE}.views")
    assert client.get("/hello/").content == b"hello v1"


def test_a_form_method_change_runs_and_a_form_field_change_is_refused(client, engine) -> None:
    _patch(engine, "forms", ".upper()", ".lower()")
    assert client.get("/form/?name=Bo").json() == {"name": "bo"}
    engine.rollback(f"{PACKAGE}.forms")
    # Form fields are collected by the form's metaclass into base_fields when the class is made.
    refusal = _refused(engine, "forms", "max_length=5", "max_length=50")
    assert "DeclarativeFieldsMetaclass" in str(refusal)
    assert "NameForm.name" in str(refusal) and "rolling reload" in str(refusal)
    assert client.get("/form/?name=Bo").json() == {"name": "BO"}
    assert client.get("/form/?name=Bobby-Lee").status_code == 400  # still max_length=5


def test_a_template_filter_change_renders_and_a_new_filter_is_refused(client, engine) -> None:
    _patch(engine, "templatetags.shout", 'f"{value}!"', 'f"{value}?!"')
    assert client.get("/page/").content == b"ann?!\n"
    engine.rollback(f"{PACKAGE}.templatetags.shout")
    assert client.get("/page/").content == b"ann!\n"
    new_filter = '\n\n@register.filter\ndef whisper(value):\n    return f"({value})"\n'
    refusal = _refused(engine, "templatetags.shout", 'f"{value}!"\n', 'f"{value}!"\n' + new_filter)
    assert "whisper registers it on register" in str(refusal), refusal
    assert "rolling reload" in str(refusal)
    assert client.get("/page/").content == b"ann!\n"


def test_a_urlconf_change_is_refused_because_the_resolver_holds_the_old_patterns(
    client, engine
) -> None:
    """Django's resolver (cached per URLconf) read ``urlpatterns`` once; a patched list would
    never be seen, so the engine refuses instead of applying a URL that answers 404."""
    added = '    path("form/", views.form),\n    path("new/", views.hello),\n'
    refusal = _refused(engine, "urls", '    path("form/", views.form),\n', added)
    assert f"{PACKAGE}.urls.urlpatterns" in str(refusal)
    assert "URLResolver.url_patterns" in str(refusal) and "needs a restart" in str(refusal)
    assert "rolling reload" in str(refusal)
    assert client.get("/new/").status_code == 404
    assert client.get("/hello/").content == b"hello v1"


def test_a_model_field_change_is_refused_and_a_model_method_change_applies(client, engine) -> None:
    module = sys.modules[f"{PACKAGE}.models"]
    note = module.Note
    fields = note._meta.get_fields()
    refusal = _refused(
        engine,
        "models",
        "max_length=100)\n",
        "max_length=100)\n    stars = models.IntegerField(default=0)\n",
    )
    assert "ModelBase" in str(refusal) and "Note.stars" in str(refusal)
    assert "restart or rolling reload is needed" in str(refusal)
    assert note._meta.get_fields() == fields
    _patch(engine, "models", 'f"note: {self.text}"', 'f"Note({self.text})"')
    assert module.Note is note and str(note(text="x")) == "Note(x)"
    engine.rollback(f"{PACKAGE}.models")
    assert str(note(text="x")) == "note: x"


def _app_registry() -> dict[str, object]:
    from django.apps import apps

    return dict(apps.all_models[PACKAGE])


@pytest.mark.parametrize("how", ["refused", "checked", "applied"])
def test_a_models_candidate_leaves_the_app_registry_as_it_was(client, engine, how) -> None:
    """A refused or checked models module (its candidate executed, so Django registered the
    candidate's classes in ``apps.all_models`` and its signal receiver) leaves the app registry
    holding the live classes and the receivers as they were, with no "Model ... was already
    registered" warning; an applied method change too."""
    from django.apps import apps
    from django.db.models.signals import post_init

    module = sys.modules[f"{PACKAGE}.models"]
    registry = _app_registry()
    assert registry == {"note": module.Note, "comment": module.Comment}
    related = [r.related_model for r in module.Note._meta.related_objects]
    assert related == [module.Comment]
    receivers = list(post_init.receivers)
    source = _source("models.py")
    if how == "refused":
        source = source.replace(
            "max_length=100)\n", "max_length=100)\n    stars = models.IntegerField()\n"
        )
    else:
        source = source.replace('f"note: {self.text}"', 'f"Note({self.text})"')
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if how == "refused":
            with pytest.raises(PatchRejected, match="restart or rolling reload is needed"):
                engine.patch(f"{PACKAGE}.models", source=source)
        elif how == "checked":
            assert not engine.check(f"{PACKAGE}.models", source=source).is_noop
        else:
            engine.patch(f"{PACKAGE}.models", source=source)
    try:
        assert [str(w.message) for w in caught] == []
        assert _app_registry() == registry
        assert all(_app_registry()[name] is model for name, model in registry.items())
        assert apps.get_model(PACKAGE, "Note") is module.Note
        assert apps.get_model(PACKAGE, "Comment") is module.Comment
        assert apps.get_models() == [module.Note, module.Comment]
        assert [r.related_model for r in module.Note._meta.related_objects] == related
        assert post_init.receivers == receivers
        assert module.Note(text="x").seen is True
        assert str(apps.get_model(PACKAGE, "Note")(text="x")) == (
            "Note(x)" if how == "applied" else "note: x"
        )
    finally:
        if how == "applied":
            engine.rollback(f"{PACKAGE}.models")
