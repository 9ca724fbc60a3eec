"""The ``condiff`` command line; the library never imports this package."""
