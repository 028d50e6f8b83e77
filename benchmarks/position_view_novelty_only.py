def win(distances, clip, sigma):
    return A.gaussian_blur(distances[:, :1].clamp(0, clip) / clip, sigma)

def up(term, size):
    return F.interpolate(term, size=size, mode="bilinear", align_corners=False)

def view(g=.5, thr=1.0):
    def fn(x, distances, clip, sigma, size):
        e = ((distances[:, -1:] - thr) / (clip - thr)).clamp(0, 1)
        return up((win(distances, clip, sigma) + g * e).clamp(max=1), size)
    return fn

VARIANTS = [("none", view(0.0)), ("g.75", view(.75)), ("thr1.25_g.75", view(.75, 1.25))]
