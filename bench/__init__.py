"""The Tidings benchmark (issue 7): Tidings, the naive app and a Node peer under the same load.

`python -m bench` (or `make bench`) starts every system on loopback, each on a
Redis server of its own, drives the same workloads through the Node load
generator in `bench/peers/loadgen.js`, prints one table and rewrites
`bench/RESULTS.md`. `python -m bench --quick` (`make bench-quick`) runs the
same at small sizes.
"""
