"""This folder ships inside the package as ``hf_multimax.hub.templates`` (see ``pyproject.toml``): the model card
template(s) of ``hf_multimax.hub``. See README.md here."""
