"""The loop's wiring: the configured methods' needs resolved to providers, and the data path.

    resolve.py    the configured methods' needs -> providers (tilt.providers), once per run, with
                  each method's keyword arguments split between its function, providers and state
    sampling.py   the train-prompt stream, sampling and scoring of groups, merging of groups
    selection.py  the configured selector's batch filter (declared in its registry entry)
"""
