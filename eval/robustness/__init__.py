"""Robustness to the site: does an encoder follow the tissue or the slide, lab, scanner? Tasks (`tasks`,
`grouped_images`), virtual labs (`virtual_labs`), the exact neighbour search (`neighbours`), the field's
metrics (`metrics`) and the `exaonepath-robustness` run (`run`)."""
