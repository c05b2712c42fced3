"""Robustness to the site: does an encoder follow the tissue or the slide, lab, scanner? Tasks (`tasks`,
`grouped_images`), virtual labs (`virtual_labs`, `protocol`), the samples table (`samples`), the exact
neighbour search (`neighbours` over `fast_search`, input checks in `checks`), the field's metrics (`metrics`),
all of them on one set of features (`measures`), the report (`report`) and the `exaonepath-robustness` run
(`run`; its parser in `cli`)."""
