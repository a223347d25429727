"""Method-specific stages of the training loop, chosen once in ``tilt.trainer.build``.

The default loop (GRPO-style: rollout -> reward -> group advantage -> learner) needs nothing
from here. A method that needs more declares it in its registry meta (``needs``), and the
pieces here supply it:

    method.py     wire_method: fills the method's slots of tilt.trainer.Parts once, in build
    needs.py      what a config needs beyond the default path (and a clear error if it is unmet)
    signals.py    rollout-time tensors: entropy/values probe, reference/teacher logits, pi_prev
                  log-probs, process-reward steps (pure), Monte-Carlo segment values (spo_chain),
                  offline V* (astar_po), GAE returns
    sampling.py   the train-prompt stream, merging of group rollouts, DAPO dynamic sampling
    selection.py  sample / token filters applied to a scored batch (d3s, pf_ppo)
    hooks.py      state carried across RL steps: AER's coefficient, HAEPO's frozen pi_prev
    stages.py     the advantage / learner stages of one RL step, built from the needs
"""
