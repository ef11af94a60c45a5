"""The Trainer's components, each one job beside the loop in megatron_pn/trainer.py (as
torchtitan keeps checkpointing, validation and metrics beside a short train loop):

    start.py      where a run starts: resume, loaded weights, refusals, fine-tuning LR
    validation.py fixed windows of the validation split (the loss the selection compares,
                  with its standard error), train.eval_sets, token losses
    selection.py  which checkpoint it keeps: early stopping, keep-best, the step-0 candidate,
                  a new best only beyond the margin of noise
    cost_log.py   what it cost: wall time x devices and CPU seconds, in run_dir/cost.json
"""
