"""Providers: one module each behind the ``Provider`` interface; see ``registry``."""
