"""Released ``IntentionForCausalLM``: bwarea's model with the released meaning of ``model(input_ids, attention_mask)``.

Released code calls the model without actions and reads the world model's logits under the policy's action at
each position, with ``.action_index`` holding those actions. bwarea's own class answers that call with the
language-model mixture instead, so this subclass only routes the call; the weights, the maths and every other
method are ``BWAreaForCausalLM``'s.
"""

from bwarea import BWAreaForCausalLM


class IntentionForCausalLM(BWAreaForCausalLM):
    def forward(self, input_ids, attention_mask=None, action_idx=None, labels=None, return_dict=True,
                use_cache=None, **kwargs):
        """Without ``action_idx``: the released uncached view, ``forward_under_policy`` (the policy's action at
        each position, the context before it under the inverse-dynamics actions; leak-free). ``use_cache=True``
        asks for the released cached path's logits instead: the policy's actions at every position, context
        included (no cache object is returned). With ``action_idx``: as ``BWAreaForCausalLM.forward``."""
        if action_idx is not None:
            return super().forward(input_ids, attention_mask, action_idx=action_idx, labels=labels,
                                   return_dict=return_dict, **kwargs)
        self._check_forward_kwargs(kwargs)
        if not use_cache:
            return self.forward_under_policy(input_ids, attention_mask, labels=labels, return_dict=return_dict)
        self._check_inputs(input_ids, attention_mask)
        actions = self.sample_actions(self.policy_logits(input_ids, attention_mask))
        self.action_info["action_idx"].append(actions[:, -1:])
        return super().forward(input_ids, attention_mask, action_idx=actions, labels=labels, return_dict=return_dict)
