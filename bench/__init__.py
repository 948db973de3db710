"""``make bench`` (= ``python -m bench``): the worker's throughput and memory, measured side by side.

One run on the embedded stack measures the ceilings (plain consume+decode, plain binary COPY),
the real worker end to end with an instant and a slow embedding server, a naive one-record-at-a-time
baseline, peak RSS against backlog size, scaling over processes and the embedding inputs saved on
redelivery; it prints each figure with its goal and writes ``bench/RESULTS.md`` and
``bench/throughput.png``.
"""
