"""The ``snac`` package, imported quietly.

snac 1.2.1 applies ``torch.jit.script`` while its modules load, and recent torch answers with a
FutureWarning on every run. It is not the user's doing, so every module of this package imports
snac from here, with that one warning silenced (scoped: no global filter is installed).

It lives here rather than in ``training/__init__`` so that importing the package stays free of
torch: ``--help``, a bad flag or a bad config value get their answer in a fraction of a second,
before torch (about 1.5 s) is loaded for the real work.
"""

import warnings

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*", category=FutureWarning)
    import snac
    import snac.attention  # noqa: F401  (loaded here, under the filter, for the modules that use it)
    import snac.layers  # noqa: F401

__all__ = ["snac"]
