import pytest
import torch

# two cores in CI: intra-op threading of tiny tensors only adds overhead
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed_and_dtype():
    torch.manual_seed(0)
    dtype = torch.get_default_dtype()
    yield
    torch.set_default_dtype(dtype)
