"""The Fig. 16-style picture of an observation over completions (Agg backend, no display)."""

import torch

from mace_core.shape.plotting import plot_completions


def test_plot_cloud_and_contact_observations(tmp_path):
    gen = torch.Generator().manual_seed(0)
    completions = torch.rand(3, 200, 3, generator=gen)
    fig = plot_completions(completions, observation=completions[0, :50],
                           scores=torch.tensor([0.9, 0.5, 0.1]), title="cloud")
    assert len(fig.axes) == 3 and fig.axes[0].get_title().startswith("#0  S=0.900")
    contacts = torch.tensor([[1.0, 0.5, 0.5], [0.0, 0.5, 0.5]])
    path = tmp_path / "contacts.png"
    plot_completions(completions.numpy(), observation=contacts,
                     contact_directions=torch.tensor([[-1.0, 0, 0], [1.0, 0, 0]]), path=path)
    assert path.stat().st_size > 1000
