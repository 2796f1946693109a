"""The source of a tiny third-party VAE module (encode/decode/log_likelihood, 8x8 images, latent 2), written
to a temporary file by the torch_module adapter's tests and by the model-contract tests (which break it)."""
import textwrap

MODULE_SOURCE = textwrap.dedent('''
    import torch
    from torch import nn

    class TinyVAE(nn.Module):
        input_shape = (1, 8, 8)

        def __init__(self, latent_dim=2):
            super().__init__()
            self.latent_dim = latent_dim
            self.enc = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, 2 * latent_dim))
            self.dec = nn.Sequential(nn.Linear(latent_dim, 16), nn.Tanh(), nn.Linear(16, 64), nn.Sigmoid())

        def encode(self, x):
            mu, pre = self.enc(x).chunk(2, dim=1)
            return mu, nn.functional.softplus(pre) + 1e-3

        def decode(self, z):
            return self.dec(z).view(-1, *self.input_shape)

        def log_likelihood(self, x, recon):
            return -0.5 * (x - recon).pow(2).flatten(1).sum(1)

    def make(latent_dim=2):
        return TinyVAE(latent_dim)
''')
