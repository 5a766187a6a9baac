"""Activity sources: what the proxy, the observer and the traces see, as ledger events.

Each source turns its own view into request events for the accounting
(:class:`sidecar.meter.Meter`) through the small protocol of
:mod:`sidecar.sources.base`; none knows another. Where two sources see the
same request (the proxy and the server's trace), :mod:`sidecar.sources.join`
joins them by the server's request id.
"""
