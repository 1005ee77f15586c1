% -- weights.c.tpl — which tensors the layer reads, as generated C: weights_present(w). One
% -- home for both backends' generated code: the CPU module's argument checks and the CUDA
% -- module's host-side forward include it.
/* 1 if every tensor this layer reads is present. */
static int weights_present(const moegen_kernel_weights *w) {
    int ok = w->router_w && w->w1 && w->w2;
% if spec.router.router_bias then
    ok = ok && w->router_b;
% end
% if spec.router.score_bias then
    ok = ok && w->score_bias;
% end
% if spec.expert_bias then
    ok = ok && w->b1 && w->b2;
% end
% if spec.shared.count > 0 then
    ok = ok && w->shared_w1 && w->shared_w2;
%   if spec.expert_bias then
    ok = ok && w->shared_b1 && w->shared_b2;
%   end
%   if spec.shared.gate then
    ok = ok && w->shared_gate;
%   end
% end
% if spec.use_residual then
    ok = ok && w->residual_w1 && w->residual_w2 && w->residual_coef_w && w->residual_coef_b;
%   if spec.expert_bias then
    ok = ok && w->residual_b1 && w->residual_b2;
%   end
% end
    return ok;
}
