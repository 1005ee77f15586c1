% -- activation_grad.c.tpl — the derivative of the activation (docs/numerics.md §8.2.4). One
% -- home for both backends' backward; the includer defines TOKEN_FN and provides sigmoid().
/* Derivative of the activation ${spec.activation} (numerics §8.2.4). */
TOKEN_FN float activation_grad(float z) {
% if spec.activation == "relu" then
    return z > 0.0f ? 1.0f : 0.0f;
% elseif spec.activation == "gelu" or spec.activation == "geglu" then
    return 0.5f * (1.0f + erff(z * 0.70710678118654752f)) + z * 0.39894228040143268f * expf(-0.5f * z * z);
% elseif spec.activation == "gelu_tanh" then
    const float k = 0.79788456080286536f;
    const float t = tanhf(k * (z + 0.044715f * z * z * z));
    return 0.5f * (1.0f + t) + 0.5f * z * (1.0f - t * t) * k * (1.0f + 3.0f * 0.044715f * z * z);
% else
    const float s = sigmoid(z);
    return s * (1.0f + z * (1.0f - s));
% end
}
