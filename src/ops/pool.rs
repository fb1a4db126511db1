//! Pooling: max pooling of a Burn `MaxPool2d` module (kd's kernel on the CPU in f32, Burn's
//! elsewhere) and global average pooling.

use burn::nn::PaddingConfig2d;
use burn::nn::pool::MaxPool2d;
use burn::tensor::Tensor;

use super::flex;

/// Symmetric padding `[pad_h, pad_w]` of `pool` when the fast kernel applies to it: no
/// dilation, floor mode, padding at most half the kernel (PyTorch's own limit).
fn fast_padding(pool: &MaxPool2d) -> Option<[usize; 2]> {
    let padding = match pool.padding {
        PaddingConfig2d::Valid => [0, 0],
        PaddingConfig2d::Explicit(top, left, bottom, right) if top == bottom && left == right => {
            [top, left]
        }
        _ => return None,
    };
    let fits = (0..2).all(|i| padding[i] <= pool.kernel_size[i] / 2 && pool.stride[i] > 0);
    (pool.dilation == [1, 1] && !pool.ceil_mode && fits).then_some(padding)
}

/// `pool.forward(x)`, through kd's kernel on the flex device in f32.
pub fn max_pool2d(pool: &MaxPool2d, x: Tensor<4>) -> Tensor<4> {
    let padding = fast_padding(pool).filter(|_| flex::is_flex_f32(&x));
    let [_, _, h, w] = x.dims();
    match padding {
        Some([ph, pw])
            if h + 2 * ph >= pool.kernel_size[0] && w + 2 * pw >= pool.kernel_size[1] =>
        {
            flex::pool::max_pool2d(x, pool.kernel_size, pool.stride, [ph, pw])
        }
        _ => pool.forward(x),
    }
}

/// Mean over the spatial dimensions: `[b, c, h, w]` -> `[b, c]`.
pub fn global_avg_pool(x: Tensor<4>) -> Tensor<2> {
    let [b, c, h, w] = x.dims();
    x.reshape([b, c, h * w]).mean_dim(2).reshape([b, c])
}
