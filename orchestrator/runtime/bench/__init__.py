"""``pdserve bench``: replay a real trace against an OpenAI endpoint and report latencies and SLO attainment.

``workload`` plans requests from a trace (pure), ``runner`` sends them and
records one ``RequestResult`` each, ``report`` summarises results (pure) and
``plot`` draws their CDFs.
"""
