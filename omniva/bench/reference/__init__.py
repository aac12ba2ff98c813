"""The reference of `bench web`: the setup a Django user would pick for a JSON API.

A bare DRF view that runs one query, in a project of its own (settings.py, urls.py,
wsgi.py) so that none of Omniva's middleware, apps or conventions run: `bench web`
serves it with gunicorn (2 x cores sync workers) on the suite's database, with
persistent connections, and compares Omniva's paths with it.
"""
