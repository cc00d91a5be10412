"""A form: its methods can be patched in place; its fields are built by Django's metaclass."""

from django import forms


class GreetForm(forms.Form):
    name = forms.CharField(max_length=40)

    def clean_name(self) -> str:
        return str(self.cleaned_data["name"]).strip()
