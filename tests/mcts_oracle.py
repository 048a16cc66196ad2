"""A slow, obvious, one-tree-at-a-time EfficientZero MCTS, written from the pseudocode (MuZero
arXiv:1911.08265 App. B: Node, MinMaxStats, select_child, ucb_score, backpropagate) with the
search semantics of mcts.py's docstring / EZ_SPEC.md §3. Test oracle for mcts.py: Python floats, Node
objects with a children dict, no tensors except at the model call.

The random parts are inputs, so that a batched search and this oracle can be compared exactly:
`root_prior` is the root prior after Dirichlet noise, `tiebreak[i][a]` the tie-break key of action
a at the node made by simulation i (the root is node 0).
"""
import math

import torch


class MinMaxStats:
    """Bounds of the Q values met on backups, for normalizing Q to [0, 1]."""

    def __init__(self, value_delta_max):
        self.minimum, self.maximum = 3.4e38, -3.4e38
        self.value_delta_max = value_delta_max

    def update(self, value):
        self.minimum = min(self.minimum, value)
        self.maximum = max(self.maximum, value)

    def normalize(self, value):
        if self.maximum > self.minimum:
            value = (value - self.minimum) / max(self.maximum - self.minimum, self.value_delta_max)
        return min(max(value, 0.0), 1.0)


class Node:
    def __init__(self, index, parent, depth, prior, value_prefix, is_reset):
        self.index = index  # the simulation that made it (root 0)
        self.parent = parent
        self.depth = depth
        self.prior = prior  # list of A floats
        self.value_prefix = value_prefix
        self.is_reset = is_reset
        self.visit_count = 0
        self.value_sum = 0.0
        self.children = {}  # action -> Node
        self.latent = None
        self.lstm_state = None

    def value(self):
        return self.value_sum / self.visit_count


def reward(parent, child):
    """r(parent -> child) from value prefixes; the prefix restarts below a reset parent."""
    return child.value_prefix - (0.0 if parent.is_reset else parent.value_prefix)


def q_value(parent, child, gamma):
    return reward(parent, child) + gamma * child.value()


def parent_mean_q(node, mean_q_above, gamma):
    """The Q given to unvisited children of `node` (EfficientZero's "parent mean Q")."""
    qs = [q_value(node, child, gamma) for child in node.children.values()]
    if node.parent is None:  # root: mean Q of the visited children, 0 if none
        return sum(qs) / len(qs) if qs else 0.0
    return (mean_q_above + sum(qs)) / (len(qs) + 1)


def ucb_score(node, action, mean_q, min_max, cfg):
    pb_c = math.log((node.visit_count + cfg["pb_c_base"] + 1) / cfg["pb_c_base"]) + cfg["pb_c_init"]
    child = node.children.get(action)
    child_visits = child.visit_count if child else 0
    prior_score = pb_c * math.sqrt(node.visit_count) / (child_visits + 1) * node.prior[action]
    value_score = q_value(node, child, cfg["gamma"]) if child else mean_q
    return prior_score + min_max.normalize(value_score)


def select_child(node, mean_q_above, min_max, tiebreak, cfg):
    """Returns (action, mean_q of this node). Ties within 1e-6: the largest tie-break key wins."""
    mean_q = parent_mean_q(node, mean_q_above, cfg["gamma"])
    scores = [ucb_score(node, a, mean_q, min_max, cfg) for a in range(len(node.prior))]
    best = max(scores)
    tied = [a for a, s in enumerate(scores) if s >= best - 1e-6]
    return max(tied, key=lambda a: tiebreak[node.index][a]), mean_q


def backpropagate(search_path, value, min_max, gamma):
    """search_path: root .. leaf. G starts at the leaf value; Q of non-root nodes feeds min-max."""
    g = value
    for node in reversed(search_path):
        node.value_sum += g
        node.visit_count += 1
        if node.parent is not None:
            r = reward(node.parent, node)
            min_max.update(r + gamma * node.value())
            g = r + gamma * g


def softmax(logits):
    m = max(logits)
    e = [math.exp(x - m) for x in logits]
    return [x / sum(e) for x in e]


def run_search(model, latent, lstm_state, root_value, root_prior, tiebreak, num_simulations, cfg):
    """One tree. latent [*latent_shape], lstm_state (h [H], c [H]) tensors; root_value float;
    root_prior list of A floats; tiebreak [num_simulations + 1][A]. Returns (root, nodes)."""
    root = Node(0, None, 0, list(root_prior), 0.0, False)
    root.visit_count, root.value_sum = 1, root_value
    root.latent, root.lstm_state = latent, lstm_state
    nodes = [root]
    min_max = MinMaxStats(cfg["value_delta_max"])
    for i in range(1, num_simulations + 1):
        node, search_path, mean_q = root, [root], 0.0
        while True:
            action, mean_q = select_child(node, mean_q, min_max, tiebreak, cfg)
            if action not in node.children:
                break
            node = node.children[action]
            search_path.append(node)
        parent = node
        with torch.no_grad():
            out = model.recurrent_inference(
                parent.latent[None], (parent.lstm_state[0][None], parent.lstm_state[1][None]),
                torch.tensor([action]), torch.tensor([parent.depth + 1]),
            )
        depth = parent.depth + 1
        is_reset = depth % cfg["lstm_horizon_len"] == 0
        child = Node(i, parent, depth, softmax(out.policy_logits[0].double().tolist()),
                     float(out.value_prefix[0]), is_reset)
        child.latent = out.latent[0]
        h, c = out.lstm_state[0][0], out.lstm_state[1][0]
        child.lstm_state = (torch.zeros_like(h), torch.zeros_like(c)) if is_reset else (h, c)
        parent.children[action] = child
        nodes.append(child)
        backpropagate(search_path + [child], float(out.value[0]), min_max, cfg["gamma"])
    return root, nodes, min_max
