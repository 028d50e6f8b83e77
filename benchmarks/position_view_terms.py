def win(distances, clip, sigma):
    return A.gaussian_blur(distances[:, :1].clamp(0, clip) / clip, sigma)

def up(term, size):
    return F.interpolate(term, size=size, mode="bilinear", align_corners=False)

def none(x, distances, clip, sigma, size):
    return up(win(distances, clip, sigma).clamp(max=1), size)

def zero(x, distances, clip, sigma, size):  # the mix is then the correction map alone, scaled
    return torch.zeros(len(distances), 1, *size)

VARIANTS = [("none", none), ("correction_alone", zero)]
