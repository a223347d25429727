"""What methods need beyond the default loop, supplied by name.

    providers.py  the provider registry: one class per named input (reference / teacher logits,
                  pi_prev log-probs, value head, process-reward steps, Monte-Carlo segment values,
                  offline V*, Lp-Reg's token choice), each with its settings and checkpointed state
    resolve.py    the configured methods' needs -> providers, once per run (clear errors if unmet)
    signals.py    the tensors providers compute (probe, frozen logits, process steps, SPO values, V*)
    sampling.py   the train-prompt stream, sampling and scoring of groups, merging of groups
    selection.py  the configured selector's batch filter (its adapter is declared in its registry entry)
"""
