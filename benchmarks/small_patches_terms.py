"""One-off variants (issue 20) for benchmarks/position_view_probe.py (commit 35f6804): the view at lighter
weights, without it, and the correction map alone, on fits with patch_probs = [0.5, 0.25, 0.125, 0.125]."""
def win(distances, clip, sigma):
    return A.gaussian_blur(distances[:, :1].clamp(0, clip) / clip, sigma)

def up(term, size):
    return F.interpolate(term, size=size, mode="bilinear", align_corners=False)

def view(g=.5, thr=1.0):
    def fn(x, distances, clip, sigma, size):
        e = ((distances[:, -1:] - thr) / (clip - thr)).clamp(0, 1)
        return up((win(distances, clip, sigma) + g * e).clamp(max=1), size)
    return fn

def zero(x, distances, clip, sigma, size):  # the mix is then the correction map alone, scaled
    return torch.zeros(len(distances), 1, *size)

VARIANTS = [("none", view(0.0)), ("g.25", view(.25)), ("g.375", view(.375)), ("correction_alone", zero)]
