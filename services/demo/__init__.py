"""`steward demo`: the UCI Online Retail slice played as a shop against a running suite.

``shop`` turns the CSV (shipped in ``data/`` with its citation) into shoppers, consent answers
and a timeline; ``play`` sends them to the suite over gRPC; ``summary`` holds what each service
then knows and renders it.
"""
