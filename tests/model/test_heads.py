import pytest
import torch

from resmemnet.model.heads import HEADS, POOLED_HEADS, PeepholeLSTM, create_head


@pytest.mark.parametrize("name", sorted(set(HEADS.names()) - POOLED_HEADS))
def test_each_head_maps_a_sequence_to_one_value_per_item(name):
    head = create_head(name, in_dim=16, seq_len=5, hidden_dim=8, dropout=0.1, peephole=False)
    out = head(torch.randn(3, 5, 16))
    assert out.shape == (3,)
    out.sum().backward()  # every head is trainable end to end


def test_lstm_initial_state_is_learnable_and_he_initialised():
    head = create_head("lstm", in_dim=16, seq_len=5, hidden_dim=256, dropout=0.0, peephole=False)
    assert head.h0.requires_grad and head.c0.requires_grad
    # He (Kaiming normal, fan_in = hidden) gives std sqrt(2 / 256) ~ 0.088
    assert 0.06 < head.h0.std().item() < 0.12


def test_peephole_cell_matches_the_papers_equations():
    torch.manual_seed(0)
    cell = PeepholeLSTM(4, 3)
    for p in (cell.w_ci, cell.w_cf, cell.w_co):
        torch.nn.init.normal_(p)
    x, h, c = torch.randn(2, 1, 4), torch.randn(2, 3), torch.randn(2, 3)
    h1, c1 = cell(x, h, c)
    W, U, b = cell.x2gates.weight, cell.h2gates.weight, cell.x2gates.bias
    gi, gf, gg, go = (x[:, 0] @ W.T + b + h @ U.T).chunk(4, dim=1)
    i = torch.sigmoid(gi + cell.w_ci * c)
    f = torch.sigmoid(gf + cell.w_cf * c)
    c_ref = f * c + i * torch.tanh(gg)
    o = torch.sigmoid(go + cell.w_co * c_ref)  # output gate peeks at the *new* cell state
    assert torch.allclose(c1, c_ref, atol=1e-6)
    assert torch.allclose(h1, o * torch.tanh(c_ref), atol=1e-6)


def test_peephole_lstm_head_runs_the_equations_from_its_learned_state_over_every_tap():
    torch.manual_seed(0)
    head = create_head("lstm", in_dim=4, seq_len=3, hidden_dim=3, dropout=0.0, peephole=True)
    cell = head.rnn
    for p in (cell.w_ci, cell.w_cf, cell.w_co):
        torch.nn.init.normal_(p)
    seq = torch.randn(2, 3, 4)
    W, U, b = cell.x2gates.weight, cell.h2gates.weight, cell.x2gates.bias
    h, c = head.h0[0].expand(2, -1), head.c0[0].expand(2, -1)
    for t in range(3):  # by hand, one tap at a time, from the learnable (h0, c0)
        gi, gf, gg, go = (seq[:, t] @ W.T + b + h @ U.T).chunk(4, dim=1)
        i, f = torch.sigmoid(gi + cell.w_ci * c), torch.sigmoid(gf + cell.w_cf * c)
        c = f * c + i * torch.tanh(gg)
        h = torch.sigmoid(go + cell.w_co * c) * torch.tanh(c)
    expected = h @ head.fc.weight.T[:, 0] + head.fc.bias
    torch.testing.assert_close(head(seq), expected)
    plain = create_head("lstm", in_dim=4, seq_len=3, hidden_dim=3, dropout=0.0, peephole=False)
    assert isinstance(plain.rnn, torch.nn.LSTM)  # the option alone switches the cell


def test_bilstm_peephole_is_refused():
    with pytest.raises(ValueError, match="unidirectional"):
        create_head("bilstm", in_dim=8, seq_len=4, hidden_dim=8, dropout=0.0, peephole=True)


def test_transformer_rejects_wrong_sequence_length():
    head = create_head("transformer", in_dim=16, seq_len=5, hidden_dim=8, dropout=0.0, peephole=False)
    with pytest.raises(ValueError, match="built for 5 taps, got 6"):
        head(torch.randn(1, 6, 16))


def test_linear_ensemble_reads_pooled_features_into_one_value_per_member():
    head = create_head("linear-ensemble", in_dim=16, seq_len=5, hidden_dim=8, dropout=0.1, peephole=False, members=4)
    torch.nn.init.normal_(head.fc.weight)
    x = torch.randn(3, 16)
    assert torch.allclose(head(x), x @ head.fc.weight.T + head.fc.bias)
    assert head(x).shape == (3, 4)
