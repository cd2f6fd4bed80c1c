"""Train a PPO agent (issue 3): the same as `rltune train`, as a script.

    python experiments/train_agent.py                       # agents/ppo.yml default entry
    python experiments/train_agent.py --set smoke --run-dir /tmp/smoke
    python experiments/train_agent.py --ship ppo-v0         # copy to agents/ppo-v0 if it passes the gate

Every run writes its own folder (config, command, Monitor CSVs, TensorBoard logs, checkpoints,
the final agent, gate.json); see rltune/train.py.
"""

import sys

from rltune.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
