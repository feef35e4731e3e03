"""Training on real offline data: built-in tasks and user data (``train.tasks``), and the
fine-tuning methods and loop that consume them.

Import the submodules directly (``from ntk_attention.train.tasks import load_task``); this
package file imports nothing so that loading one part never pulls in the others.
"""
