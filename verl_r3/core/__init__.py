"""The core room: routing records, replay and metrics, in pure torch.

``family_modules`` names the modules that register model families (``register_family``) when
imported. The core never names them itself: the package that ships adapters appends its module
here (``verl_r3/__init__.py`` appends ``verl_r3.families``), and the first lookup of a family
imports whatever is listed. Importing this package imports nothing.
"""

family_modules: list[str] = []
