"""The autograd-memory replay on small hand-built graphs whose answers are worked out by hand."""

from planner.graph import Graph, peak_point, simulate


def test_chain_forward_frees_unsaved_and_backward_frees_saved():
    # x (external, 10) -> a (20, saved by op2) -> b (30, output)
    g = Graph()
    x = g.tensor((10, 0), rg=True, external=True)
    a = g.tensor((20, 0), rg=True)
    b = g.tensor((30, 0), rg=True)
    g.op("op1", [x], [a])
    g.op("op2", [a], [b], saved=[a])
    t = simulate(g, outputs=[b], incoming_grads=[b])
    # forward: after op1 x(10)+a(20)=30; after op2 x is freed at its last use (op1), a kept, b alive: 20+30
    assert max(p.at(1) for p in t.forward) == 50
    assert t.kept == (20, 0)  # a, saved
    assert t.outputs == (30, 0)
    # backward: kept a(20) + incoming grad b(30); op2 allocates grad a (20) -> 70 at its peak
    assert max(p.at(1) for p in t.backward) == 70
    # after backward only the gradient of the external input remains
    assert t.grad_inputs == (10, 0)


def test_gradient_reaching_a_tensor_twice_is_summed_in_place():
    g = Graph()
    x = g.tensor((10, 0), rg=True, external=True)
    y1 = g.tensor((10, 0), rg=True)
    y2 = g.tensor((10, 0), rg=True)
    z = g.tensor((10, 0), rg=True)
    g.op("u1", [x], [y1])
    g.op("u2", [x], [y2])
    g.op("add", [y1, y2], [z], grad_alias=[y1, y2])
    t = simulate(g, outputs=[z], incoming_grads=[z])
    # add passes the incoming gradient to both inputs (no copy); u2 then creates grad x (10);
    # u1's grad x is summed into it: a transient second copy (10): grad z(10) + x grads (10 + 10) = 30
    assert max(p.at(1) for p in t.backward) == 30
    assert t.grad_inputs == (10, 0)


def test_batch_and_fixed_channels_scale_separately():
    g = Graph()
    x = g.tensor((100, 0), rg=True, external=True)
    w = g.tensor((0, 1000), rg=True, kind="weight_copies")
    y = g.tensor((50, 0), rg=True)
    g.op("cast", [], [w])
    g.op("mm", [x, w], [y], saved=[x, w])
    t = simulate(g, outputs=[y], incoming_grads=[y])
    p1, p8 = peak_point(t.forward, 1), peak_point(t.forward, 8)
    assert p1.at(1) == 100 + 1000 + 50
    assert p8.at(8) == 8 * 150 + 1000
    assert p8.kinds_at(8)["weight_copies"] == 1000


def test_held_tensors_survive_backward_but_piece_scope_does_not():
    g = Graph()
    x = g.tensor((10, 0), rg=True, external=True)
    c = g.tensor((5, 0), rg=True)
    y = g.tensor((10, 0), rg=True)
    g.hold(x, scope="piece")  # a checkpoint's input
    g.op("cache", [x], [c])
    g.hold(c)  # a KV cache
    g.op("f", [c], [y], saved=[c])
    t = simulate(g, outputs=[y], incoming_grads=[y])
    assert t.held == (5, 0)  # only the step-scoped cache
    assert t.kept == (15, 0)  # the checkpoint input and the cache, through forward
