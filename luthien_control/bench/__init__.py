"""``luthien-control bench``: the proxy measured against the direct call to the mock.

``cli`` runs it (entry point ``luthien_control.bench.cli:main``), ``processes`` starts,
pins, samples and stops the servers, ``load`` is the load generator (a process of its
own), ``verify`` checks that requests really reach the backend, ``report`` turns rounds
into medians, targets, a table and JSON. The method is in docs/performance.md.
"""
